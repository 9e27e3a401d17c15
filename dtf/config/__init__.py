"""The run's configuration: the typed Config, its absl flags, and the parsing of --task and --data_service
specs. No TensorFlow."""
from dtf.config.config import Config

__all__ = ["Config"]
