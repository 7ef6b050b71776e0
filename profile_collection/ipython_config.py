c = get_config()  # noqa: F821
c.InteractiveShellApp.matplotlib = "auto"
c.TerminalIPythonApp.display_banner = False
