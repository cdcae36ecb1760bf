"""Importable core of specctl: no command-line code lives here."""
