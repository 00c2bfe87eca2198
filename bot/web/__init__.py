"""`ritmo serve`: the read-only JSON API, the dashboard and the control commands (docs/design.md §13)."""
