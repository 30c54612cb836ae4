from mistral_edge.errors import first_line


def test_first_line_of_empty_and_multiline_messages():
    assert first_line(ValueError("")) == "ValueError"  # was IndexError in three copies
    assert first_line(OSError("  \n\n  ")) == "OSError"
    assert first_line(RuntimeError("\n  first  \nsecond")) == "first"
