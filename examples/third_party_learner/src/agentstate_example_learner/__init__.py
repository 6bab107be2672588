"""An example third-party agentstate plugin."""
