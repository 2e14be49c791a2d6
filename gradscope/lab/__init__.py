"""The MNIST lab built on the recorder: datasets and their download, the model zoo, the
instrumented training loop, the depth sweep and the teaching text's reproductions. The
reusable core (gradscope.recorder, stats, native, distributed, frame, diagnose, schema)
imports nothing from here."""
