"""Planning: the GPU table, and (later) memory budgets and build limits."""
