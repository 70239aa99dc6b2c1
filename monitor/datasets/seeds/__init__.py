"""Hand-written seed lists the shipped data sets are built from (see ``monitor.datasets.build``)."""
