"""Built-in front-ends (installed as pyshm.frontends)."""
