from moec.compiler.cli import main

main()
