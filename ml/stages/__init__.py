"""The four SCAN stages. Each reads what the previous one wrote to the run directory."""
