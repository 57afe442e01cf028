from swapmoe_edge.cli.main import main

main()
