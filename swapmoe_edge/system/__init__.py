"""The machine: memory, cgroups, the budget monitor, page cache, device profiles."""
