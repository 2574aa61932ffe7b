"""The build pipeline: turn a ModelSpec into a checked, cached artifact under models/."""
