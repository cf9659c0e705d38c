"""Stage runners: each runs one kind of cut point (or decode step) for whatever steps the plan holds there.
``cut``: views, selections and the layout cut shared by the LLM-side cut points; ``vision``: cuts between
vision-encoder layers; ``llm_input``: the LLM input; ``llm``: before decoder layers; ``decode``: generate()'s
decode steps on the compacted cache."""
