"""Serving: the model repository, hot-swappable slots, the scheduler and the local API."""
