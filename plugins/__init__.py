"""Built-in state learners, each registered through the `agentstate` entry-point group."""
