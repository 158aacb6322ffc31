from dsv3.cli import main

main()
