"""The remote side: mounts the client's root with FUSE and runs the command there."""
