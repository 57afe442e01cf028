"""One forward pass: sessions, the split model, MoE routing, generation, kernels and rungs. No budget, no threads."""
