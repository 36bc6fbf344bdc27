from erofs_tools.cli import main

main()
