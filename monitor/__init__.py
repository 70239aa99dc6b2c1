"""safety-monitor: watch what a deployed language model is thinking."""

__version__ = "0.1.0"
