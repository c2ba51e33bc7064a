from mrrl.cli import main

main()
