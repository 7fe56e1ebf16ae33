"""The built-in gem plugins. Each module registers through the same hooks a third party uses."""
