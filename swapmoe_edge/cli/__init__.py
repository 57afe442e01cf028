"""The `swapmoe` command: one thin module per verb group."""
