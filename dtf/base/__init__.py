"""What every layer shares: errors, exit codes, logging, supported versions. No TensorFlow."""
