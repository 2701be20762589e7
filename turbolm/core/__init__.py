"""The ground every method stands on: model loading, the vanilla decode loop and sampling, chat
formatting, dataset rows, the machine's description, fast CPU kernels, atomic files, model
patches and the exception family. Nothing here imports a method or a tool."""
