"""The simulated world: data, simulators, tools, environment, reward (pure Python)."""
