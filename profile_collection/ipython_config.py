c = get_config()  # noqa: F821
c.TerminalIPythonApp.display_banner = False
