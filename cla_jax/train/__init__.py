"""Training: optimizer, state, jitted steps and the loop."""
