NAME = "embed"
HELP = "todo"

def main() -> None:
    raise SystemExit("not yet")
