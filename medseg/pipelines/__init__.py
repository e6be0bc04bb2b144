"""Whole jobs over the engines: each step is the library function behind its command.

The layer between the command line and the engines (``medseg.train``, ``medseg.infer``,
``medseg.evaluate``): a pipeline may import any of them, none of them imports a pipeline.

- :mod:`medseg.pipelines.job`: ``medseg run``, a dataset -> preprocess -> train -> infer -> evaluate, resumable.
- :mod:`medseg.pipelines.demo`: ``medseg demo``, generated phantoms, then the job above on them.
"""
