from editdecay.cli import main

main()
