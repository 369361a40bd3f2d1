"""python -m rmoe"""

from rmoe.cli import main

main()
