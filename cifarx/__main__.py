from cifarx.cli import main

main()
