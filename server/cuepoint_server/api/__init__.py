"""gRPC adapters over the domain core: conversion, error mapping, servicers."""
