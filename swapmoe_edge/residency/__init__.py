"""Which experts are resident: importance, profile, predictor, planner, the engine and its policies."""
