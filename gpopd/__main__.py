from gpopd.cli import entry

entry()
