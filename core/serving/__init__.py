"""What a serving replica runs: the loaded build, its state machine, user-embedding broadcast, canary routing, the sidecar."""
