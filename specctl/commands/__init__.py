"""One thin module per subcommand: parse the profile, call the core, print and report."""
