"""`vitc build` itself: the front end, the stages declared as data, the pass runner, loading and the output folder."""
