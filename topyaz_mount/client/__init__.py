"""The laptop side: the ssh connection and its session, the jail and the file
server that answer the agent, the mount daemon and its control socket, host
profiles and setup."""
