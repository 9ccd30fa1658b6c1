"""negdpo: the command-line front end over core, generator, preference and segmentation."""

__version__ = "0.1.0"
