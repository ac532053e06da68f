"""The Ray job: the driver's steps, preflight, the sampling actor, the run folder."""
