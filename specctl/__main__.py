from specctl.cli import app

app()
