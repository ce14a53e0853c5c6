"""The method core: the adapter config, layers and their one autograd function, methods, LaMDA, injection, merge."""
