from mixprec.cli import main

main()
