"""topyaz-mount: run Topaz Labs jobs on a remote GPU host through a reverse FUSE mount."""

__version__ = "0.1.0"
