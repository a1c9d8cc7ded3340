from dicomcloud.cli import app

app()
