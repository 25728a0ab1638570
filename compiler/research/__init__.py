"""Where the error comes from and which policy to pick: `vitc analyze` (+ report.html), `search`, `ablate`, the simulator."""
