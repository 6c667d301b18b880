"""Shared by the bench scripts: print (figure, value) rows as a Markdown table."""


def print_table(rows: list[tuple[str, str]]) -> None:
    w = max(len(a) for a, _ in rows)
    print(f"| {'figure'.ljust(w)} | value |\n|{'-' * (w + 2)}|-------|")
    for a, b in rows:
        print(f"| {a.ljust(w)} | {b} |")
