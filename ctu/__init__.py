"""ctu: feedback-guided RL for tool-using customer-service agents, in JAX."""
