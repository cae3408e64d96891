"""`prepare_dataset.py`: turning the study's raw datasets into training folders with one caption per image.

Files:
    output.py     what every command writes and how: resizing, the N_concept folder, summary.md/.json,
                  the all-or-nothing write, the --overwrite rule, the options every command shares
    hands11k.py   `11k-hands`: HandInfo.csv read and checked row by row, the caption grammar, the split by person
    folder.py     `folder`: every image under a folder with one caption (Palms, Handshakes, generations)
    ratings.py    `from-ratings`: the images of a rating database with one score (library.evaluate.export's choice)

Each command module exposes `COMMANDS` = {name: (help, add_arguments(parser), run(args))}, as the modules
behind evaluate.py do. Top-level imports stay light (no torch), so that `--help` and a bad CSV answer at once.
"""
