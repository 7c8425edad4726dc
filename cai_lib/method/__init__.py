"""The method of Bai et al. 2022, stage by stage: critique-revision, SFT, response pairs, AI
feedback, the preference model, RL, human data, labeller accuracy, and the evaluation. Each stage is
a function over records and model references with a config model beside it. Imports the engines
and the core, never the platform."""
