from cifarx.cli.main import main

main()
